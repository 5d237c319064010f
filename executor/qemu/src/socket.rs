//! The thin socket layer under the QMP, QGA and control clients (over a Unix socket, or the vz
//! driver's vsock stream): one read from the peer, with the error mapping, end-of-stream check
//! and wire trace they share. The codecs (`wire`, `qmp`, `qga`) stay free of I/O.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::ProtocolError;

/// Reads what `peer` has sent into `buffer` and returns those bytes; a closed socket is
/// [`ProtocolError::Closed`].
pub async fn read_some<'b, S: AsyncRead + Unpin>(
    socket: &mut S,
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
