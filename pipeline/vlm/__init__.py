"""Pruned tokens into a LLaVA-NeXT model: the feed (``inputs_embeds`` without the vision tower), configs, training."""
