//! `medvlm serve`: flags to [`crate::serve::ServeOptions`].

use super::*;

pub(super) fn run_serve(a: ServeArgs) -> Result<()> {
    // At most a year: deadlines are instants, and an instant too far ahead overflows.
    const MAX_SECS: f64 = 365.0 * 86400.0;
    let secs = |name: &str, v: f64| -> Result<std::time::Duration> {
        if !(v.is_finite() && v > 0.0 && v <= MAX_SECS) {
            bail!("{name} must be a positive number of seconds, at most {MAX_SECS}, got {v:?}");
        }
        Ok(std::time::Duration::from_secs_f64(v))
    };
    if a.max_body_mb == 0 {
        bail!("--max-body-mb must be at least 1");
    }
    if let Some(k) = &a.api_key {
        check_api_key(k)?;
    }
    crate::serve::run(crate::serve::ServeOptions {
        source: a.model.source(),
        // DICOM/NIfTI windows and slices are per request ("window", "slice").
        processor: a.limits.options(Default::default()),
        host: a.host,
        port: a.port,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        served_model_name: a.served_model_name,
        api_key: a.api_key,
        allowed_local_media_path: a.allowed_local_media_path,
        max_body_bytes: a.max_body_mb.saturating_mul(1 << 20),
        request_timeout: secs("--request-timeout", a.request_timeout)?,
        shutdown_timeout: secs("--shutdown-timeout", a.shutdown_timeout)?,
        reasoning: a.reasoning_format,
        prefill_chunk: a.prefill_chunk,
        max_connections: a.max_connections,
        header_timeout: secs("--header-timeout", a.header_timeout)?,
        idle_timeout: secs("--idle-timeout", a.idle_timeout)?,
        body_timeout: secs("--body-timeout", a.body_timeout)?,
        decode_budget: a.decode_budget_mb.map(|mb| mb.saturating_mul(1 << 20)),
    })
}

/// A key that clients can send: an empty one (a deploy script's unset `$KEY`) would
/// otherwise have meant an open server, and a key with surrounding spaces or characters a
/// header cannot carry could never be matched.
fn check_api_key(k: &str) -> Result<()> {
    if k.trim().is_empty() {
        bail!(
            "--api-key (or MEDVLM_API_KEY) is empty; give a key, or leave the flag out to \
             serve without one"
        );
    }
    if k.trim() != k {
        bail!("--api-key must not begin or end with spaces");
    }
    if !k.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        bail!("--api-key must be printable ASCII (it travels in an HTTP header)");
    }
    Ok(())
}
