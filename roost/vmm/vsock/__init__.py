"""roost's own vhost-user-vsock device backend for QEMU, where the host has no vhost-vsock.

A process of its own (`python -I -m roost.vmm.vsock`, standard library only, importing nothing
else from roost so it starts fast) that gives the guest AF_VSOCK and the host Firecracker's
hybrid vsock on Unix sockets. See `__main__` for its command line and behaviour.
"""
