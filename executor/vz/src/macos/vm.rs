//! One `VZVirtualMachine`: its configuration from a [`VmSpec`], its lifecycle on its own
//! dispatch queue with the completion handlers bridged to tokio, and vsock connections to it.
//!
//! Compile-checked only (clippy for `aarch64-apple-darwin` on Linux); it has not run on a Mac.
//!
//! The framework requires every call on a `VZVirtualMachine` to happen on the queue it was
//! created with, and calls each completion handler on that queue: [`QueueBound`] is how the
//! machine travels into the closures submitted there, and nothing touches it elsewhere.

use std::mem::ManuallyDrop;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::rc::Retained;
use objc2::runtime::NSObjectProtocol;
use objc2::{AnyThread, sel};
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDiskImageCachingMode, VZDiskImageStorageDeviceAttachment, VZDiskImageSynchronizationMode,
    VZFileHandleSerialPortAttachment, VZGenericPlatformConfiguration, VZLinuxBootLoader,
    VZNATNetworkDeviceAttachment, VZSharedDirectory, VZSingleDirectoryShare,
    VZVirtioBlockDeviceConfiguration, VZVirtioConsoleDeviceSerialPortConfiguration,
    VZVirtioEntropyDeviceConfiguration, VZVirtioFileSystemDeviceConfiguration,
    VZVirtioNetworkDeviceConfiguration, VZVirtioSocketConnection, VZVirtioSocketDevice,
    VZVirtioSocketDeviceConfiguration, VZVirtualMachine, VZVirtualMachineConfiguration,
    VZVirtualMachineState,
};
use tokio::sync::oneshot;

use crate::entitlement::framework_error;
use crate::spec::{DiskCaching, DiskSync, HostLimits, VmSpec};
use crate::transport::VsockStream;
use crate::{VzError, spec};

/// An Objective-C object that may only be used on one dispatch queue.
struct QueueBound<T>(Retained<T>);

// SAFETY: the framework's objects are not thread-safe, but they may be moved between threads
// as long as they are used on one queue only; a `QueueBound` is only dereferenced in closures
// submitted to the queue its VM was created with (`Vm::on_queue`, `Vm::call`).
unsafe impl<T> Send for QueueBound<T> {}
// SAFETY: as above; shared references are only used on that queue.
unsafe impl<T> Sync for QueueBound<T> {}

impl<T> QueueBound<T> {
    /// The object; only to be called on its queue. (A method, so that a closure captures the
    /// whole `QueueBound` rather than the field inside it.)
    fn get(&self) -> &T {
        &self.0
    }
}

/// What this Mac allows, from the framework's class properties.
pub fn host_limits() -> HostLimits {
    // SAFETY: class properties without arguments, callable from any thread.
    unsafe {
        HostLimits {
            min_cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount() as u64,
            max_cpus: VZVirtualMachineConfiguration::maximumAllowedCPUCount() as u64,
            min_memory_bytes: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory_bytes: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        }
    }
}

fn url(path: &Path, what: &'static str) -> Result<Retained<NSURL>, VzError> {
    NSURL::from_file_path(path).ok_or_else(|| VzError::FileMissing {
        what,
        path: path.to_owned(),
    })
}

/// A directory's URL (a file URL marked as a directory, as `VZSharedDirectory` wants).
fn directory_url(path: &Path, what: &'static str) -> Result<Retained<NSURL>, VzError> {
    NSURL::from_directory_path(path).ok_or_else(|| VzError::FileMissing {
        what,
        path: path.to_owned(),
    })
}

fn message(error: &NSError) -> String {
    error.localizedDescription().to_string()
}

/// The framework's configuration for `spec`, validated (the entitlement is checked here).
fn configuration(spec: &VmSpec) -> Result<Retained<VZVirtualMachineConfiguration>, VzError> {
    let kernel = url(&spec.kernel, "kernel")?;
    let initrd = url(&spec.initrd, "initramfs")?;
    let console =
        std::fs::File::create(&spec.console_log).map_err(|source| VzError::WriteFile {
            path: spec.console_log.clone(),
            source,
        })?;
    // SAFETY: every call below builds fresh configuration objects on this thread, with
    // arguments of the types the framework documents; none is shared until it is validated.
    unsafe {
        let configuration = VZVirtualMachineConfiguration::new();
        configuration.setPlatform(&VZGenericPlatformConfiguration::new());
        let boot = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
        boot.setInitialRamdiskURL(Some(&initrd));
        boot.setCommandLine(&NSString::from_str(&spec.cmdline));
        configuration.setBootLoader(Some(&boot));
        configuration.setCPUCount(spec.cpus as usize);
        configuration.setMemorySize(spec.memory_bytes);

        let mut disks = Vec::new();
        for disk in &spec.disks {
            let caching = match disk.caching {
                DiskCaching::Automatic => VZDiskImageCachingMode::Automatic,
                DiskCaching::Cached => VZDiskImageCachingMode::Cached,
                DiskCaching::Uncached => VZDiskImageCachingMode::Uncached,
            };
            let sync = match disk.sync {
                DiskSync::Full => VZDiskImageSynchronizationMode::Full,
                DiskSync::Fsync => VZDiskImageSynchronizationMode::Fsync,
                DiskSync::None => VZDiskImageSynchronizationMode::None,
            };
            let attachment =
                VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
                    VZDiskImageStorageDeviceAttachment::alloc(),
                    &*url(&disk.path, "disk")?,
                    disk.read_only,
                    caching,
                    sync,
                )
                .map_err(|error| {
                    framework_error(
                        format!("attach disk `{}`", disk.path.display()),
                        message(&error),
                    )
                })?;
            let device = VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                &attachment,
            );
            disks.push(device.into_super());
        }
        configuration.setStorageDevices(&NSArray::from_retained_slice(&disks));

        let mut shares = Vec::new();
        for share in &spec.shares {
            spec::check_tag(&share.tag)?;
            let directory = VZSharedDirectory::initWithURL_readOnly(
                VZSharedDirectory::alloc(),
                &*directory_url(&share.path, "share")?,
                share.read_only,
            );
            let single = VZSingleDirectoryShare::initWithDirectory(
                VZSingleDirectoryShare::alloc(),
                &directory,
            );
            let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                VZVirtioFileSystemDeviceConfiguration::alloc(),
                &NSString::from_str(&share.tag),
            );
            device.setShare(Some(&single));
            shares.push(device.into_super());
        }
        configuration.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        if spec.vsock {
            configuration.setSocketDevices(&NSArray::from_retained_slice(&[
                VZVirtioSocketDeviceConfiguration::new().into_super(),
            ]));
        }
        if spec.network {
            let nic = VZVirtioNetworkDeviceConfiguration::new();
            nic.setAttachment(Some(&VZNATNetworkDeviceAttachment::new()));
            configuration.setNetworkDevices(&NSArray::from_retained_slice(&[nic.into_super()]));
        }

        // The file handle owns the console log's descriptor from here on.
        let handle = NSFileHandle::initWithFileDescriptor_closeOnDealloc(
            NSFileHandle::alloc(),
            std::os::fd::IntoRawFd::into_raw_fd(console),
            true,
        );
        let attachment =
            VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
                VZFileHandleSerialPortAttachment::alloc(),
                None,
                Some(&handle),
            );
        let serial = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        serial.setAttachment(Some(&attachment));
        configuration.setSerialPorts(&NSArray::from_retained_slice(&[serial.into_super()]));
        configuration.setEntropyDevices(&NSArray::from_retained_slice(&[
            VZVirtioEntropyDeviceConfiguration::new().into_super(),
        ]));

        configuration
            .validateWithError()
            .map_err(|error| framework_error("validate the VM configuration", message(&error)))?;
        Ok(configuration)
    }
}

/// Whether `configuration` can be saved and restored: `Err` says why not (before macOS 14
/// the framework has no save/restore at all).
fn save_restore_support(configuration: &VZVirtualMachineConfiguration) -> Result<(), String> {
    if !configuration.respondsToSelector(sel!(validateSaveRestoreSupportWithError:)) {
        return Err("saving VM states needs macOS 14 or later".to_owned());
    }
    // SAFETY: the selector exists (checked above); called on the thread that built it.
    unsafe { configuration.validateSaveRestoreSupportWithError() }.map_err(|error| message(&error))
}

impl Drop for Vm {
    /// Stops the VM if it still runs (a driver dropped without `close`) and releases it on its
    /// own queue, where the framework wants every use of it.
    fn drop(&mut self) {
        // SAFETY: `machine` is not used again: this is `drop`.
        let machine = unsafe { ManuallyDrop::take(&mut self.machine) };
        self.queue.exec_async(move || {
            // SAFETY: on the machine's queue; the completion handler ignores the outcome.
            unsafe {
                if machine.get().canStop() {
                    let ignored = RcBlock::new(|_: *mut NSError| {});
                    machine.get().stopWithCompletionHandler(&ignored);
                }
            }
            drop(machine);
        });
    }
}

/// A VM created (not yet started) from a [`VmSpec`].
pub struct Vm {
    /// Taken only by `Drop`, which hands the last reference to the machine's queue.
    machine: ManuallyDrop<Arc<QueueBound<VZVirtualMachine>>>,
    queue: DispatchRetained<DispatchQueue>,
    save_restore: Result<(), String>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Vm")
            .field("save_restore", &self.save_restore)
            .finish_non_exhaustive()
    }
}

type Completion = Result<(), String>;

/// The longest a lifecycle call (start, stop, pause, save, restore) may take: a save writes
/// the guest's whole memory, a few GB at most, well within it.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl Vm {
    /// Builds and validates the configuration and creates the VM on a queue of its own.
    pub fn new(spec: &VmSpec) -> Result<Vm, VzError> {
        // SAFETY: a class property without arguments, callable from any thread.
        if !unsafe { VZVirtualMachine::isSupported() } {
            return Err(framework_error(
                "create the VM",
                "this Mac cannot run virtual machines (`VZVirtualMachine.isSupported` is false; \
                 is ci-exec itself running in a VM?)",
            ));
        }
        let configuration = configuration(spec)?;
        let save_restore = save_restore_support(&configuration);
        let queue = DispatchQueue::new("dev.ci-exec.vz", None);
        let configuration = QueueBound(configuration);
        let created: Arc<Mutex<Option<QueueBound<VZVirtualMachine>>>> = Arc::default();
        let slot = created.clone();
        let queue_for_init = queue.clone();
        queue.exec_sync(move || {
            // SAFETY: the VM is created on the queue it is bound to, from a validated
            // configuration.
            let machine = unsafe {
                VZVirtualMachine::initWithConfiguration_queue(
                    VZVirtualMachine::alloc(),
                    configuration.get(),
                    &queue_for_init,
                )
            };
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(QueueBound(machine));
            }
        });
        let machine = created
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .ok_or_else(|| framework_error("create the VM", "no VM was created"))?;
        Ok(Vm {
            machine: ManuallyDrop::new(Arc::new(machine)),
            queue,
            save_restore,
        })
    }

    /// `Ok` when this VM's state can be saved and restored, else why not.
    pub fn save_restore_support(&self) -> &Result<(), String> {
        &self.save_restore
    }

    /// Runs `work` with the machine on its queue and waits for it.
    fn on_queue<R: Send + 'static>(
        &self,
        work: impl FnOnce(&VZVirtualMachine) -> R + Send + 'static,
    ) -> Option<R> {
        let machine = Arc::clone(&self.machine);
        let result: Arc<Mutex<Option<R>>> = Arc::default();
        let slot = result.clone();
        self.queue.exec_sync(move || {
            let value = work(machine.get());
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(value);
            }
        });
        result.lock().ok().and_then(|mut slot| slot.take())
    }

    /// Calls an asynchronous method of the machine on its queue and waits for its completion
    /// handler.
    async fn call(
        &self,
        action: &str,
        work: impl FnOnce(&VZVirtualMachine, &block2::DynBlock<dyn Fn(*mut NSError)>) + Send + 'static,
    ) -> Result<(), VzError> {
        let (sender, receiver) = oneshot::channel::<Completion>();
        let sender = Arc::new(Mutex::new(Some(sender)));
        let machine = Arc::clone(&self.machine);
        self.queue.exec_async(move || {
            let completion = RcBlock::new(move |error: *mut NSError| {
                // SAFETY: the framework passes nil or a valid NSError for the call's duration.
                let outcome = match unsafe { error.as_ref() } {
                    None => Ok(()),
                    Some(error) => Err(message(error)),
                };
                if let Some(sender) = sender.lock().ok().and_then(|mut slot| slot.take()) {
                    let _ = sender.send(outcome);
                }
            });
            work(machine.get(), &completion);
        });
        match tokio::time::timeout(CALL_TIMEOUT, receiver).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => Err(framework_error(action, message)),
            Ok(Err(_)) => Err(framework_error(
                action,
                "the completion handler was dropped",
            )),
            Err(_) => Err(framework_error(
                action,
                format!("no answer within {CALL_TIMEOUT:?}"),
            )),
        }
    }

    pub async fn start(&self) -> Result<(), VzError> {
        self.call("start the VM", |machine, completion| {
            // SAFETY: on the machine's queue, with a completion handler of the right type.
            unsafe { machine.startWithCompletionHandler(completion) }
        })
        .await
    }

    /// Stops the VM at once (the guest gets no chance to shut down: it is a throwaway).
    pub async fn stop(&self) -> Result<(), VzError> {
        let can_stop = self
            .on_queue(|machine| {
                // SAFETY: on the machine's queue.
                unsafe { machine.canStop() }
            })
            .unwrap_or(false);
        if !can_stop {
            return Ok(());
        }
        self.call("stop the VM", |machine, completion| {
            // SAFETY: as in `start`.
            unsafe { machine.stopWithCompletionHandler(completion) }
        })
        .await
    }

    pub async fn pause(&self) -> Result<(), VzError> {
        self.call("pause the VM", |machine, completion| {
            // SAFETY: as in `start`.
            unsafe { machine.pauseWithCompletionHandler(completion) }
        })
        .await
    }

    pub async fn resume(&self) -> Result<(), VzError> {
        self.call("resume the VM", |machine, completion| {
            // SAFETY: as in `start`.
            unsafe { machine.resumeWithCompletionHandler(completion) }
        })
        .await
    }

    /// Saves the paused VM's state to `path` (macOS 14+).
    pub async fn save(&self, path: &Path) -> Result<(), VzError> {
        let state = QueueBound(url(path, "saved state")?);
        self.call("save the VM state", move |machine, completion| {
            // SAFETY: as in `start`; the URL is a file URL.
            unsafe { machine.saveMachineStateToURL_completionHandler(state.get(), completion) }
        })
        .await
    }

    /// Restores a saved state into this (stopped) VM, which then is paused (macOS 14+).
    pub async fn restore(&self, path: &Path) -> Result<(), VzError> {
        let state = QueueBound(url(path, "saved state")?);
        self.call("restore the VM state", move |machine, completion| {
            // SAFETY: as in `start`; the URL is a file URL.
            unsafe { machine.restoreMachineStateFromURL_completionHandler(state.get(), completion) }
        })
        .await
    }

    /// Whether the VM runs (or is being started, paused or saved): not stopped or failed.
    pub fn is_alive(&self) -> bool {
        self.on_queue(|machine| {
            // SAFETY: on the machine's queue.
            let state = unsafe { machine.state() };
            state != VZVirtualMachineState::Stopped && state != VZVirtualMachineState::Error
        })
        .unwrap_or(false)
    }

    /// Connects to vsock `port` of the guest.
    pub async fn connect(&self, port: u32) -> Result<VsockStream, VzError> {
        let action = format!("connect to vsock port {port}");
        let (sender, receiver) = oneshot::channel::<Result<OwnedFd, String>>();
        let sender = Arc::new(Mutex::new(Some(sender)));
        let machine = Arc::clone(&self.machine);
        self.queue.exec_async(move || {
            let send = move |outcome: Result<OwnedFd, String>| {
                if let Some(sender) = sender.lock().ok().and_then(|mut slot| slot.take()) {
                    let _ = sender.send(outcome);
                }
            };
            // SAFETY: on the machine's queue; the configuration has one socket device, a
            // virtio one.
            let device = unsafe { machine.get().socketDevices() }
                .firstObject()
                .and_then(|device| device.downcast::<VZVirtioSocketDevice>().ok());
            let Some(device) = device else {
                send(Err("the VM has no virtio socket device".to_owned()));
                return;
            };
            let send = Arc::new(Mutex::new(Some(send)));
            let completion = RcBlock::new(
                move |connection: *mut VZVirtioSocketConnection, error: *mut NSError| {
                    // SAFETY: the framework passes nil or valid objects for the call's
                    // duration.
                    let outcome = match unsafe { (connection.as_ref(), error.as_ref()) } {
                        (_, Some(error)) => Err(message(error)),
                        (None, None) => Err("no connection and no error".to_owned()),
                        (Some(connection), None) => {
                            // The connection closes its descriptor when it is released: keep
                            // a duplicate of our own.
                            // SAFETY: the descriptor is open while `connection` lives.
                            let fd = unsafe { BorrowedFd::borrow_raw(connection.fileDescriptor()) };
                            fd.try_clone_to_owned().map_err(|error| error.to_string())
                        }
                    };
                    if let Some(send) = send.lock().ok().and_then(|mut slot| slot.take()) {
                        send(outcome);
                    }
                },
            );
            // SAFETY: on the machine's queue, with a completion handler of the right type.
            unsafe { device.connectToPort_completionHandler(port, &completion) };
        });
        let fd = match receiver.await {
            Ok(Ok(fd)) => fd,
            Ok(Err(message)) => return Err(framework_error(action, message)),
            Err(_) => {
                return Err(framework_error(
                    action,
                    "the completion handler was dropped",
                ));
            }
        };
        VsockStream::new(fd).map_err(|error| framework_error(action, error.to_string()))
    }
}
