"""Exporters: ONNX (with past key/values), TorchScript and torch.export, each re-run and compared with PyTorch."""
