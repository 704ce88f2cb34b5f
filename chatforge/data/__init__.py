"""Pretraining data: downloads, document streams, and the packing loader."""
