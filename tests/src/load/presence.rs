//! The `presence` scenario (see `run`).

use std::sync::Arc;

use super::report::Report;
use super::{Failure, RunCtx};

pub fn run(_ctx: &Arc<RunCtx>) -> Result<Report, Failure> {
    Err(Failure {
        message: "the presence scenario is not implemented yet".into(),
        report: None,
    })
}
