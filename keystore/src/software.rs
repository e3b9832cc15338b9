//! Software backend (being written).
