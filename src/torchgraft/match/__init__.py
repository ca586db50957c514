"""Matching a checkpoint's tensors to a target model's tensors."""
