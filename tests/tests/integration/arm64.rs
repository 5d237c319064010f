//! The aarch64 guest (`debian-bookworm-arm64`) under qemu-system-aarch64: what only this image
//! has. Its conformance suites are `conformance::qemu_arm64` and `qemu_arm64_podman`.

use ci_exec_driver::Task;
use ci_exec_tests::Output;

/// The guest agent over vsock, as the `vz` driver reaches it, in the guest's real kernel: QEMU
/// here has no vsock device (that needs the host's vhost-vsock), so the guest's loopback
/// transport carries the connection, from a client in the guest to `ci-exec-init --agent
/// vsock:PORT` — the same listener and framing the init serves on port 1024 with
/// `ci.transport=vsock`.
#[tokio::test]
async fn the_guest_agent_answers_over_vsock_in_the_arm64_guest() {
    let Some(driver) = ci_exec_tests::drivers::qemu_arm64().await else {
        return;
    };
    // A vsock client in perl (perl-base is in every Debian guest): AF_VSOCK is 40, and a
    // sockaddr_vm is family, reserved, port, CID and four zero bytes. CID 1 is the local one.
    let script = r#"
set -e
uname -m
modprobe vsock_loopback
/usr/sbin/ci-exec-init --agent vsock:2024 &
agent=$!
perl <<'PERL'
use strict;
my $socket;
for my $try (1 .. 200) {
    socket($socket, 40, 1, 0) or die "socket: $!";
    last if connect($socket, pack("SSLLx4", 40, 0, 2024, 1));
    close($socket);
    undef $socket;
    select(undef, undef, undef, 0.05);
}
defined $socket or die "nothing listens on vsock port 2024";
sub ask {
    syswrite($socket, "$_[0]\n") or die "write: $!";
    my $answer = <$socket>;
    defined $answer or die "no answer to $_[0]";
    return $answer;
}
print "sync: ", ask('{"execute":"guest-sync","arguments":{"id":42}}');
my $started = ask('{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","exit 7"]}}');
my ($pid) = $started =~ /"pid":\s*(\d+)/ or die "no pid in $started";
for (1 .. 200) {
    my $status = ask(qq({"execute":"guest-exec-status","arguments":{"pid":$pid}}));
    if ($status =~ /"exited":\s*true/) {
        print "status: $status";
        last;
    }
    select(undef, undef, undef, 0.05);
}
PERL
kill "$agent"
"#;
    let task = Task::new("vsock", ["sh", "-c", script]);
    let output = Output::of(&*driver.run_container(task).await.expect("run")).await;
    driver.close().await.expect("close");
    let stdout = output.stdout_text();
    assert_eq!(output.code, 0, "{stdout}{}", output.stderr_text());
    assert!(stdout.starts_with("aarch64\n"), "{stdout}");
    assert!(stdout.contains("sync: {\"return\":42}\n"), "{stdout}");
    assert!(stdout.contains("\"exitcode\":7"), "{stdout}");
}
