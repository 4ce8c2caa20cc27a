//! A one-shot timer for device threads' epoll loops: a monotonic timerfd whose reads never block.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

/// Shortest delay armed: a zero duration would disarm the timerfd instead of firing it.
const MIN_DELAY: Duration = Duration::from_micros(100);

/// A one-shot monotonic timer. Its fd becomes readable when it fires; the owner's epoll loop
/// then calls [`Timer::acknowledge`].
pub struct Timer(TimerFd);

impl Timer {
    /// A disarmed timer with a non-blocking fd.
    pub fn new() -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        // SAFETY: fcntl on a descriptor this function owns; the flags are plain integers.
        let ret = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Timer(timer))
    }

    /// Fires once after `delay` (at least [`MIN_DELAY`]), replacing any earlier arming.
    pub fn arm(&mut self, delay: Duration) -> std::io::Result<()> {
        self.0
            .reset(delay.max(MIN_DELAY), None)
            .map_err(std::io::Error::from)
    }

    /// Stops the timer; an expiration not yet acknowledged stays readable.
    pub fn disarm(&mut self) -> std::io::Result<()> {
        self.0.clear().map_err(std::io::Error::from)
    }

    /// Consumes the expiration that made the fd readable.
    pub fn acknowledge(&self) {
        let mut expirations = [0u8; 8];
        // The result does not matter: EAGAIN only means a re-arm already reset the expiration.
        // SAFETY: `expirations` is a live, writable buffer of the 8 bytes a timerfd read needs.
        let _ = unsafe { libc::read(self.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(timer: &Timer, wait_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: timer.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait_ms) == 1 }
    }

    #[test]
    fn fires_once_is_acknowledged_and_can_be_disarmed() {
        let mut timer = Timer::new().unwrap();
        assert!(!readable(&timer, 0), "a new timer is disarmed");
        timer.arm(Duration::ZERO).unwrap();
        assert!(readable(&timer, 5000), "a zero delay still fires");
        timer.acknowledge();
        assert!(!readable(&timer, 0));
        // Acknowledging with nothing pending does not block.
        timer.acknowledge();
        timer.arm(Duration::from_secs(3600)).unwrap();
        timer.disarm().unwrap();
        assert!(!readable(&timer, 0));
    }
}
