"""The GPT, its optimizer, the --depth dial, and checkpoints."""
