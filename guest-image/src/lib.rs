//! Guest images for ci-exec VMs: build, fetch, verify and cache.
