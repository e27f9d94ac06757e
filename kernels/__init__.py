"""Custom ops (torch.library) with C++ and Triton implementations."""
