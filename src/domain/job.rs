//! Re-wrap jobs: what a job does ([`JobKind`]), where it stands ([`JobState`]), and which
//! DEKs it moves ([`needs_rewrap`]).

use super::kek::is_newer_version;

named_enum!(
    /// What a re-wrap job does.
    JobKind, "job kind" {
        /// New version of the same KEK.
        Rotation => "rotation",
        /// Every DEK moves to another KEK.
        Replacement => "replacement",
    }
);

named_enum!(
    /// Where a re-wrap job stands: pending, then running, then completed or failed; waiting
    /// while the KMS refuses a key; superseded when a newer rotation of the same key takes
    /// over.
    JobState, "job state" {
        /// Created, not planned yet.
        Pending => "pending",
        /// Planned and being worked.
        Running => "running",
        /// The KMS refused a key; resumes when the key is usable again.
        Waiting => "waiting",
        /// Every DEK moved.
        Completed => "completed",
        /// Some DEKs failed for good.
        Failed => "failed",
        /// A newer rotation of the same key took over.
        Superseded => "superseded",
    }
);

/// Whether a DEK under `version` must move to `target`: every DEK of a replaced key; in a
/// rotation, those under an older version ([`is_newer_version`]), never rolling one back.
pub fn needs_rewrap(kind: JobKind, version: &str, target: &str) -> bool {
    kind == JobKind::Replacement || is_newer_version(version, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_versions_only_move_forward() {
        assert!(needs_rewrap(JobKind::Rotation, "1", "2"));
        assert!(
            needs_rewrap(JobKind::Rotation, "9", "10"),
            "numeric, not lexical"
        );
        assert!(!needs_rewrap(JobKind::Rotation, "3", "2"));
        assert!(!needs_rewrap(JobKind::Rotation, "2", "2"));
        assert!(needs_rewrap(JobKind::Rotation, "mat-a", "mat-b"));
        assert!(!needs_rewrap(JobKind::Rotation, "mat-b", "mat-b"));
        assert!(needs_rewrap(JobKind::Replacement, "2", "2"));
    }

    #[test]
    fn names_match_the_schema() {
        // The CHECK constraints of rewrap_jobs.kind and rewrap_jobs.state list these names.
        let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ["rotation", "replacement"]);
        let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            states,
            [
                "pending",
                "running",
                "waiting",
                "completed",
                "failed",
                "superseded"
            ]
        );
        assert_eq!(
            serde_json::to_string(&JobState::Superseded).expect("serialize"),
            "\"superseded\""
        );
    }
}
