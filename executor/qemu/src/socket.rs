//! The thin socket layer under the QMP and QGA clients: one read from the peer, with the error
//! mapping, end-of-stream check and wire trace both share. The codecs (`wire`, `qmp`, `qga`)
//! stay free of I/O.

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::error::ProtocolError;

/// Reads what `peer` has sent into `buffer` and returns those bytes; a closed socket is
/// [`ProtocolError::Closed`].
pub async fn read_some<'b>(
    socket: &mut UnixStream,
    buffer: &'b mut [u8],
    peer: &'static str,
) -> Result<&'b [u8], ProtocolError> {
    let read = socket
        .read(buffer)
        .await
        .map_err(|source| ProtocolError::Read { peer, source })?;
    if read == 0 {
        return Err(ProtocolError::Closed { peer });
    }
    let received = &buffer[..read];
    tracing::trace!(peer, received = %String::from_utf8_lossy(received).trim_end());
    Ok(received)
}
