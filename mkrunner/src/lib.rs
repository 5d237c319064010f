//! A Plan 9 mk(1): parses mkfiles, builds the dependency graph and runs recipes.
