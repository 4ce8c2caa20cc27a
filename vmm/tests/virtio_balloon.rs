//! virtio-balloon free page reporting through real KVM: the `virtio_balloon` test guest is the
//! driver (three queues, a report on the reporting queue, polling the used ring) and reads the
//! reported memory back.

use std::time::Duration;

use mvm_testkit::{config_for, guest, require_kvm, run_vmm_config};
use serde_json::json;

/// The guest's report of a whole page drops its host page (it reads back zero) and leaves the
/// page beside it alone; half a page is answered and dropped nowhere; the config space shows
/// a target of 0 pages and the `actual` the driver wrote; only VIRTIO_BALLOON_F_REPORTING is
/// offered (besides VIRTIO_F_VERSION_1, in the high word).
#[test]
fn a_reported_free_page_is_dropped_on_the_host() {
    if !require_kvm("a_reported_free_page_is_dropped_on_the_host") {
        return;
    }
    let mut config = config_for(&guest("virtio_balloon"), "console=ttyS0", 1, 32);
    config["balloon"] =
        json!({"amount_mib": 0, "deflate_on_oom": false, "free_page_reporting": true});
    let run = run_vmm_config(&config, Duration::from_secs(120));
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(
        run.stdout,
        "features: 00000020\n\
         num_pages=0 actual=7\n\
         page: len=0 a=00 b=a5\n\
         half page: len=0 a=a5 b=a5\n",
        "{run:#?}"
    );
}
