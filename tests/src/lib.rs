//! End-to-end tests of fleetbench live in tests/.
