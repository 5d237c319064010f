//! A publisher's cloud image as a qemu guest (`ci-exec image build ubuntu-24.04`): it boots
//! as downloaded, with nothing installed into it, and our init brings the agent and `mk`.
//! CI builds the image from a stand-in in Canonical's format served on loopback
//! (`.ci/setup-test-images.sh`, `guest-image/tests/fixtures/make-ubuntu-cloud-image.sh`).

use ci_exec_driver::Task;
use ci_exec_tests::Output;

#[tokio::test]
async fn the_stock_image_boots_with_our_agent_and_mk_and_is_never_written() {
    let Some(driver) = ci_exec_tests::drivers::qemu_ubuntu_cloud().await else {
        return;
    };
    let manifest = ci_exec_qemu::resolve_image(ci_exec_tests::drivers::UBUNTU_CLOUD_IMAGE)
        .expect("the image is built");
    let disk_before = std::fs::read(&manifest.disk).expect("disk");
    // What the guest shows: the image's own OS, no qemu-ga of its own, our agent serving in
    // its place, and our mk on the path.
    let script = "\
        . /etc/os-release; echo \"os=$ID $VERSION_ID\"; \
        test -e /usr/sbin/qemu-ga && echo has-qemu-ga; \
        command -v podman >/dev/null && echo has-podman; \
        for pid in /proc/[0-9]*; do \
            [ \"$(tr '\\0' ' ' < $pid/cmdline)\" = 'ci-exec-init --agent /dev/virtio-ports/org.qemu.guest_agent.0 ' ] && \
            echo \"agent=$(readlink $pid/exe)\"; \
        done; \
        mk -f /dev/null 2>&1 | head -n 1; command -v mk";
    let task = Task::new("inspect", ["sh", "-c", script]);
    let output = Output::of(&*driver.run_container(task).await.expect("run")).await;
    driver.close().await.expect("close");
    let stdout = output.stdout_text();
    assert_eq!(output.code, 0, "{stdout}{}", output.stderr_text());
    assert!(stdout.contains("os=ubuntu 24.04\n"), "{stdout}");
    assert!(!stdout.contains("has-qemu-ga"), "{stdout}");
    assert!(!stdout.contains("has-podman"), "{stdout}");
    assert!(
        stdout.contains("agent=/usr/sbin/ci-exec-init\n"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("agent=").count(), 1, "{stdout}");
    assert!(stdout.contains("mk: error: nothing to mk"), "{stdout}");
    assert!(stdout.ends_with("/usr/local/bin/mk\n"), "{stdout}");
    assert!(
        std::fs::read(&manifest.disk).expect("disk") == disk_before,
        "the cached disk changed"
    );
}
