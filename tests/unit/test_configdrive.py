from guest.spec import BootConfig, ProcessSpec
from shim.vm.configdrive import build_config_drive, read_config_drive


def test_config_drive_round_trip(tmp_path):
    config = BootConfig(
        container_id="c" * 64,
        token="secret",
        hostname="box",
        process=ProcessSpec(args=["echo", "hi"], env=["A=1"], cwd="/tmp", user="1000", tty=True),
        layer_count=2,
        hosts="127.0.0.1 localhost\n",
        resolv_conf="",
    )
    iso = build_config_drive(config, tmp_path / "config.iso")
    assert iso.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))
    assert read_config_drive(iso) == config


def test_iso9660_signature(tmp_path):
    config = BootConfig(container_id="x", token="t", hostname="h", process=ProcessSpec(args=["true"]), layer_count=1)
    data = build_config_drive(config, tmp_path / "c.iso").read_bytes()
    assert data[0x8001:0x8006] == b"CD001"
