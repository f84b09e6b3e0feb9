//! Notification delivery benchmark (written in a following commit).
fn main() {}
