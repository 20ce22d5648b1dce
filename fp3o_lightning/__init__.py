"""FP3O (Full-Pipeline PPO) for cooperative multi-agent RL on PyTorch Lightning and TorchRL."""
