//! RFC 7512 URIs (being written).
