//! Shared harness for the integration and conformance suites.
