//! A listening vsock socket (`AF_VSOCK`), for `ci.transport=vsock`: the guest agent and the
//! control port when the host is Apple's Virtualization.framework, which connects to guest
//! ports over vsock and has no named virtio-serial ports.
//!
//! Hand-written on `libc` because the binary must stay a small static one: the vsock crates
//! pull in an async runtime or `nix`, for the three system calls used here.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long [`Listener::bind`] waits for the kernel's vsock transport: it is a module that
/// loads in the background while the init starts (`modules`).
const TRANSPORT_WAIT: Duration = Duration::from_secs(30);

/// A vsock stream socket listening on one port of any of the guest's CIDs.
pub struct Listener {
    socket: OwnedFd,
}

impl Listener {
    /// Binds `port` and listens, waiting for the vsock transport to exist first.
    pub fn bind(port: u32) -> io::Result<Self> {
        let deadline = Instant::now() + TRANSPORT_WAIT;
        loop {
            match Self::try_bind(port) {
                // Before `vmw_vsock_virtio_transport` is loaded the address family or the
                // local CID is missing.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::ENODEV)
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    fn try_bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; every field that matters is set below.
        let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        address.svm_port = port;
        address.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `address` is a valid sockaddr_vm of the size given.
        let bound = unsafe {
            libc::bind(
                fd,
                std::ptr::from_ref(&address).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a bound stream socket.
        if unsafe { libc::listen(fd, 4) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { socket })
    }

    /// The next connection, as a file to read and write.
    pub fn accept(&self) -> io::Result<File> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: accept4 on our listening socket; the peer address is not wanted.
            let fd = unsafe {
                libc::accept4(
                    self.socket.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is a fresh descriptor nothing else owns.
                return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}
