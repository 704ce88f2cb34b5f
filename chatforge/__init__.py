"""chatforge: from raw text to your own ChatGPT-like model, in one package.

    raw text --tokenizer train--> tokenizer --> packed token rows --pretrain--> base model
    conversations --midtrain--> mid model --sft--> sft model --rl--> rl model
    any checkpoint --> engine (KV cache, sampling, python tool) --> chat CLI, OpenAI-style server
    every stage's JSON --> report.md

Reading order: runtime.py and paths.py (where things run and live), tokenizer.py and
conversation.py (text <-> ids), data/ (documents -> packed rows), model/ (the GPT, its optimizer,
checkpoints), train/ (the stages), infer/ (the engine), then the front ends (chat_cli, serve).
"""

__version__ = "0.1.0"
