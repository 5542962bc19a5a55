//! STUB (replaced by helper)
