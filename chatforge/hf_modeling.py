"""transformers' NanoChat with sliding-window layers: shipped inside an export, never imported by chatforge.

`chatforge export` copies this file verbatim into the export folder as `modeling_chatforge.py` when
the model has `S` (sliding-window) layers, and points config.json's `auto_map` at it, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` builds it. Everything but the
attention mask is transformers' own NanoChat class: the built-in class gives every layer the full
causal mask, which is exact only for models whose layers are all `L`.

A query at position q sees keys q - sliding_window < k <= q in `sliding_attention` layers, which is
chatforge's window (`model/gpt.py`, the window counts the query itself). The config has its own
model_type ("chatforge") so that loading without trust_remote_code fails loudly instead of quietly
building the built-in class, which would attend past the window.

Written against transformers 5.x, where the cache argument is called `cache` (4.x called it
`past_key_values`; both are accepted here).
"""

import inspect

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.models.nanochat.modeling_nanochat import (
    NanoChatDecoderLayer,
    NanoChatForCausalLM,
    NanoChatModel,
)

_CACHE_ARG = "cache" if "cache" in inspect.signature(NanoChatDecoderLayer.forward).parameters else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class ChatforgeConfig(NanoChatConfig):
    model_type = "chatforge"

    # strict configs only keep declared fields; these two are what the cache and the masks read
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)


class ChatforgeModel(NanoChatModel):
    config_class = ChatforgeConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            # built from the config, so sliding layers keep only their window of keys and values
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (past + torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device))[None]

        mask_args = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                     _MASK_CACHE_ARG: cache, "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        hidden_states = self.norm(hidden_states)  # NanoChat norms the embedding before the first block
        for layer, layer_type in zip(self.layers[: self.config.num_hidden_layers], self.config.layer_types):
            hidden_states = layer(hidden_states, attention_mask=masks[layer_type],
                                  position_embeddings=position_embeddings, position_ids=position_ids,
                                  **{_CACHE_ARG: cache}, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_ARG: cache})


class ChatforgeForCausalLM(NanoChatForCausalLM):
    config_class = ChatforgeConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = ChatforgeModel(config)
        self.post_init()
