//! Native driver: tasks as host processes.
