//! Reading lines from an agent's pipe with a length limit: an agent can
//! never make the daemon buffer more than `max_line_bytes` of one line, and
//! an over-long line is skipped to its end instead of ending the stream.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line read from a pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Text(String),
    /// A line longer than the limit: its first [`HEAD_BYTES`] bytes
    /// (decoded lossily), the rest discarded.
    TooLong(String),
    /// A line that is not UTF-8, decoded lossily (invalid bytes become
    /// U+FFFD).
    NotUtf8(String),
}

/// How much of an over-long line is kept: enough to tell what it was
/// (an agent's message type and task id come first).
pub const HEAD_BYTES: usize = 512;

/// A line reader with a length limit. Cancel safe: dropping a pending
/// [`LineReader::next_line`] loses nothing.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    max: usize,
    partial: Vec<u8>,
    discarding: bool,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// Reads lines of at most `max` bytes from `reader`.
    pub fn new(reader: R, max: usize) -> Self {
        Self {
            reader,
            max: max.max(1),
            partial: Vec::new(),
            discarding: false,
        }
    }

    /// The next line, or `None` at end of stream (a final line without a
    /// newline is returned first).
    ///
    /// # Errors
    /// An I/O error of the pipe.
    ///
    /// # Cancel safety
    /// Cancel safe: state lives in `self` and changes only after a read
    /// completes.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let buffer = self.reader.fill_buf().await?;
            if buffer.is_empty() {
                if self.discarding {
                    return Ok(Some(self.too_long()));
                }
                if self.partial.is_empty() {
                    return Ok(None);
                }
                let bytes = std::mem::take(&mut self.partial);
                return Ok(Some(to_line(bytes)));
            }
            let newline = buffer.iter().position(|byte| *byte == b'\n');
            let take = newline.map_or(buffer.len(), |index| index + 1);
            let chunk = &buffer[..newline.unwrap_or(buffer.len())];
            if !self.discarding && self.partial.len() + chunk.len() > self.max {
                // Too long: its head is kept, the rest discarded as it comes.
                self.discarding = true;
                self.partial.truncate(HEAD_BYTES);
            }
            if self.discarding {
                let keep = HEAD_BYTES.saturating_sub(self.partial.len());
                self.partial
                    .extend_from_slice(&chunk[..keep.min(chunk.len())]);
            } else {
                self.partial.extend_from_slice(chunk);
            }
            self.reader.consume(take);
            if newline.is_some() {
                if self.discarding {
                    return Ok(Some(self.too_long()));
                }
                let bytes = std::mem::take(&mut self.partial);
                return Ok(Some(to_line(bytes)));
            }
        }
    }
}

impl<R> LineReader<R> {
    /// The over-long line being discarded, ended.
    fn too_long(&mut self) -> Line {
        self.discarding = false;
        let head = std::mem::take(&mut self.partial);
        Line::TooLong(String::from_utf8_lossy(&head).into_owned())
    }
}

fn to_line(mut bytes: Vec<u8>) -> Line {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    match String::from_utf8(bytes) {
        Ok(text) => Line::Text(text),
        Err(error) => Line::NotUtf8(String::from_utf8_lossy(error.as_bytes()).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: &[u8], max: usize) -> Vec<Line> {
        let reader = tokio::io::BufReader::with_capacity(4, input);
        let mut lines = LineReader::new(reader, max);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_and_skips_long_ones() {
        let lines = read_all(b"short\r\nthis line is too long\nok\n\xff\xfe\nlast", 8).await;
        assert_eq!(
            lines,
            [
                Line::Text("short".into()),
                Line::TooLong("this line is too long".into()),
                Line::Text("ok".into()),
                Line::NotUtf8("\u{fffd}\u{fffd}".into()),
                Line::Text("last".into()),
            ]
        );
    }

    #[tokio::test]
    async fn an_over_long_line_keeps_only_its_head() {
        let mut input = vec![b'a'; 5000];
        input.extend_from_slice(b"\nnext\n");
        assert_eq!(
            read_all(&input, 100).await,
            [
                Line::TooLong("a".repeat(HEAD_BYTES)),
                Line::Text("next".into())
            ]
        );
    }

    #[tokio::test]
    async fn long_final_line_and_empty_input() {
        assert_eq!(
            read_all(b"0123456789", 4).await,
            [Line::TooLong("0123456789".into())]
        );
        assert!(read_all(b"", 4).await.is_empty());
        assert_eq!(read_all(b"\n", 4).await, [Line::Text(String::new())]);
    }
}
