"""Custom ops (torch.library) with C++ and Triton implementations (filled by the kernels issue)."""
