//! What validating the YAML of the ferrymesh.io kinds this crate holds (TrafficPolicy,
//! DestinationRule) reports: the field, by its path under `spec`, and what is wrong with it.

/// A field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {message}")]
pub struct SpecError {
    /// Path of the field, e.g. `spec.fault.abort.percentage.value`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A [`SpecError`] of `field`.
pub(crate) fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}
