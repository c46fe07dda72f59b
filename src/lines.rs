//! Reading lines from an agent's pipe with a length limit: an agent can
//! never make the daemon buffer more than `max_line_bytes` of one line, and
//! an over-long line is skipped to its end instead of ending the stream.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line read from a pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Text(String),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
    /// A line that is not UTF-8, decoded lossily (invalid bytes become
    /// U+FFFD).
    NotUtf8(String),
}

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
                    self.discarding = false;
                    return Ok(Some(Line::TooLong));
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
            if !self.discarding {
                if self.partial.len() + chunk.len() > self.max {
                    self.discarding = true;
                    self.partial.clear();
                } else {
                    self.partial.extend_from_slice(chunk);
                }
            }
            self.reader.consume(take);
            if newline.is_some() {
                if self.discarding {
                    self.discarding = false;
                    return Ok(Some(Line::TooLong));
                }
                let bytes = std::mem::take(&mut self.partial);
                return Ok(Some(to_line(bytes)));
            }
        }
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
                Line::TooLong,
                Line::Text("ok".into()),
                Line::NotUtf8("\u{fffd}\u{fffd}".into()),
                Line::Text("last".into()),
            ]
        );
    }

    #[tokio::test]
    async fn long_final_line_and_empty_input() {
        assert_eq!(read_all(b"0123456789", 4).await, [Line::TooLong]);
        assert!(read_all(b"", 4).await.is_empty());
        assert_eq!(read_all(b"\n", 4).await, [Line::Text(String::new())]);
    }
}
