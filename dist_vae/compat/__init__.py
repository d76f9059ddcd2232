"""Adapters: the only modules that touch private names of torch, DeepSpeed and Accelerate."""
