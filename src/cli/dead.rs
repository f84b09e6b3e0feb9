//! `byokd dead ...`: the dead-letter queue.
