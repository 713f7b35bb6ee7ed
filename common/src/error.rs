//! Errors for one log line.

/// The causes of an error, joined by `": "` (empty when it has none), for one log line.
pub fn source_chain(err: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = err.source();
    while let Some(e) = cur {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// The error and its causes on one line, e.g. "cannot read /x: No such file or directory".
pub fn error_line(err: &dyn std::error::Error) -> String {
    let chain = source_chain(err);
    if chain.is_empty() {
        err.to_string()
    } else {
        format!("{err}: {chain}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_after_the_error() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(source_chain(&e), "inner");
        assert_eq!(error_line(&e), "outer: inner");
        assert_eq!(error_line(&std::io::Error::other("alone")), "alone");
    }
}
