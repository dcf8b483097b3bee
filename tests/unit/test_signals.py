import os
import signal

from telepathy.train.signals import PreemptionFlag


def test_flag_records_a_real_signal_and_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag(["SIGUSR1"]) as flag:
        assert not flag.is_set
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.is_set and flag.name == "SIGUSR1" and flag.count == 1
        assert flag.received_at is not None
    assert signal.getsignal(signal.SIGUSR1) is before


def test_watch_switches_to_the_configured_signals():
    before_term, before_usr2 = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    with PreemptionFlag(["SIGTERM"]) as flag:
        flag.watch(["SIGUSR2"])
        assert signal.getsignal(signal.SIGTERM) is before_term
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.name == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is before_usr2
