//! The provider simulator (filled by the simulator work).
