//! Docker and podman drivers over the Engine API.
