//! `byokd jobs ...`: re-wrap jobs.
