//! The mk job flow, result store and replay.
