//! One domain error for every refusal a caller can get (quickwit's `ServiceErrorCode`): an
//! [`ErrorCode`] and a message, mapped once to a gRPC status (`From<ApiError> for
//! tonic::Status`) and once to an HTTP status and JSON code name ([`ErrorCode::http_status`],
//! [`ErrorCode::as_str`]). Services below the edge return [`ApiError`]; only the gRPC and
//! HTTPS edges turn it into their transport's answer.

use std::fmt;

/// What kind of refusal, independent of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A parameter is malformed or out of range (gRPC INVALID_ARGUMENT, HTTP 400).
    InvalidArgument,
    /// No credential, or one that is not accepted (UNAUTHENTICATED, 401).
    Unauthenticated,
    /// The caller's role may not do this (PERMISSION_DENIED, 403).
    PermissionDenied,
    /// No such route or object (NOT_FOUND, 404).
    NotFound,
    /// The collector is not set up for this (FAILED_PRECONDITION, 412).
    FailedPrecondition,
    /// A limit was reached (RESOURCE_EXHAUSTED, 429).
    ResourceExhausted,
    /// Not served at all (UNIMPLEMENTED; HTTP answers 405 for a method it does not serve).
    Unimplemented,
    /// A dependency (the store, the audit log) cannot answer now; retry (UNAVAILABLE, 503).
    Unavailable,
    /// A bug or a broken invariant (INTERNAL, 503).
    Internal,
}

impl ErrorCode {
    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::NotFound => tonic::Code::NotFound,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::ResourceExhausted => tonic::Code::ResourceExhausted,
            Self::Unimplemented => tonic::Code::Unimplemented,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status code of the HTTPS API.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::FailedPrecondition => 412,
            Self::ResourceExhausted => 429,
            Self::Unimplemented | Self::Unavailable | Self::Internal => 503,
        }
    }

    /// The snake_case name the HTTPS API puts in `{"code": ...}` (the gRPC code's name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::FailedPrecondition => "failed_precondition",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unimplemented => "unimplemented",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// A refusal: its code and a message for the caller (which field, which value, what to do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code.grpc(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// A refusal with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    /// [`ErrorCode::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    /// [`ErrorCode::Unauthenticated`].
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }
    /// [`ErrorCode::PermissionDenied`].
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }
    /// [`ErrorCode::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    /// [`ErrorCode::FailedPrecondition`].
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }
    /// [`ErrorCode::Unimplemented`].
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unimplemented, message)
    }
    /// [`ErrorCode::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    /// [`ErrorCode::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message for the caller.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.code.grpc(), e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidArgument,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::NotFound,
        ErrorCode::FailedPrecondition,
        ErrorCode::ResourceExhausted,
        ErrorCode::Unimplemented,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    #[test]
    fn statuses_map_to_http_codes_and_snake_case_names() {
        assert_eq!(ErrorCode::PermissionDenied.http_status(), 403);
        assert_eq!(ErrorCode::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorCode::InvalidArgument.http_status(), 400);
        assert_eq!(ErrorCode::PermissionDenied.as_str(), "permission_denied");
        // The JSON code name is the gRPC code's name in snake_case, for every code.
        for code in ALL {
            let camel = format!("{:?}", code.grpc());
            let snake: String = camel
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                    sep.into_iter()
                        .chain(std::iter::once(c.to_ascii_lowercase()))
                })
                .collect();
            assert_eq!(code.as_str(), snake);
        }
    }

    #[test]
    fn a_grpc_status_keeps_the_code_and_the_message() {
        let s = tonic::Status::from(ApiError::failed_precondition("no policy"));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "no policy");
        assert_eq!(
            ApiError::invalid_argument("bad").to_string(),
            "InvalidArgument: bad"
        );
    }
}
