"""Models: the Flax NNX ResNet backbone and the import of Hugging Face ResNet weights."""
