//! Bounded reading of an untrusted file: every read and skip is checked against the file length
//! first, so a lying length becomes [`FormatError::Truncated`] before any allocation or seek.

use std::io::{self, Read, Seek, SeekFrom};

use super::FormatError;

/// A reader over a file of known length that tracks its own position.
pub(crate) struct Src<'a, R> {
    inner: &'a mut R,
    pos: u64,
    len: u64,
}

impl<R> std::fmt::Debug for Src<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Src")
            .field("pos", &self.pos)
            .field("len", &self.len)
            .finish()
    }
}

/// Maps an I/O error, an early end of stream becoming truncation of `what`.
pub(crate) fn io_error(e: io::Error, what: &'static str) -> FormatError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FormatError::Truncated { what }
    } else {
        FormatError::Io(e)
    }
}

impl<'a, R: Read + Seek> Src<'a, R> {
    /// A source positioned at the start of a file of `len` bytes.
    pub(crate) fn start(inner: &'a mut R, len: u64) -> Result<Self, FormatError> {
        inner.seek(SeekFrom::Start(0)).map_err(FormatError::Io)?;
        Ok(Src { inner, pos: 0, len })
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bytes between the position and the end of the file.
    pub(crate) fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails with truncation of `what` unless `n` more bytes exist.
    pub(crate) fn need(&self, n: u64, what: &'static str) -> Result<(), FormatError> {
        if n > self.remaining() {
            return Err(FormatError::Truncated { what });
        }
        Ok(())
    }

    pub(crate) fn read_exact(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), FormatError> {
        let n = buf.len() as u64;
        self.need(n, what)?;
        self.inner.read_exact(buf).map_err(|e| io_error(e, what))?;
        self.pos += n;
        Ok(())
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], FormatError> {
        let mut buf = [0u8; N];
        self.read_exact(&mut buf, what)?;
        Ok(buf)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads `n` bytes after checking `n` against `limit` and against the file.
    pub(crate) fn bytes(
        &mut self,
        n: u64,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, FormatError> {
        if n > limit {
            return Err(FormatError::TooLarge {
                what,
                len: n,
                limit,
            });
        }
        self.need(n, what)?;
        let len = usize::try_from(n).map_err(|_| FormatError::TooLarge {
            what,
            len: n,
            limit,
        })?;
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, what)?;
        Ok(buf)
    }

    /// Moves `n` bytes forward without reading them (within the file only).
    pub(crate) fn skip(&mut self, n: u64, what: &'static str) -> Result<(), FormatError> {
        if n == 0 {
            return Ok(());
        }
        self.need(n, what)?;
        let delta = i64::try_from(n).map_err(|_| FormatError::Truncated { what })?;
        self.inner
            .seek_relative(delta)
            .map_err(|e| io_error(e, what))?;
        self.pos += n;
        Ok(())
    }

    /// Moves to absolute offset `pos` (at most the file length).
    pub(crate) fn seek_to(&mut self, pos: u64, what: &'static str) -> Result<(), FormatError> {
        if pos > self.len {
            return Err(FormatError::Truncated { what });
        }
        if pos != self.pos {
            self.inner
                .seek(SeekFrom::Start(pos))
                .map_err(|e| io_error(e, what))?;
            self.pos = pos;
        }
        Ok(())
    }
}
