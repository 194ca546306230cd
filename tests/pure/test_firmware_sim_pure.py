"""firmware-sim's inputs without a TPM: which firmware a device boots (release, file images,
per-component versions, tampering), the manufacturer CA configuration it renders, and command
line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError
from firmware_sim.boot import BOOT_ORDER, default_components, demo_image
from firmware_sim.cli import _build_parser, _manufacturer_ca_check, main
from firmware_sim.device import TPM_DIR, firmware_components
from firmware_sim.swtpm import (
    STATE_FILE,
    ensure_manufacturer_ca,
    load_manufacturer_ca,
    make_manufacturer_ca,
)

pytestmark = pytest.mark.pure


def test_default_release_is_the_demo_release() -> None:
    assert firmware_components("1.2") == default_components("1.2")


def test_images_versions_and_tampering(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel bytes")
    parts = firmware_components(
        "2.0", images={"kernel": kernel}, versions={"agent": "2.0.1"}, tamper=["rootfs"]
    )
    by_name = {c.name: c for c in parts}
    assert [c.name for c in parts] == list(BOOT_ORDER)
    assert by_name["kernel"].read_image() == b"kernel bytes"
    assert by_name["kernel"].version == "2.0" and by_name["kernel"].pcr == 4
    assert by_name["agent"].version == "2.0.1"
    assert by_name["agent"].read_image() == demo_image("agent", "2.0")
    rootfs = by_name["rootfs"].read_image()
    assert rootfs != demo_image("rootfs", "2.0") and len(rootfs) == len(demo_image("rootfs", "2.0"))
    assert by_name["rootfs"].version == "2.0"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": {"initrd": "/x"}}, "no firmware component 'initrd'"),
        ({"versions": {"kernel": "bad version!"}}, "version"),
        ({"tamper": ["initrd"]}, "no component 'initrd'"),
    ],
)
def test_refused_inputs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        firmware_components("1.0", **kwargs)  # type: ignore[arg-type]


def test_manufacturer_ca_config_is_rendered_into_its_own_directory(tmp_path: Path) -> None:
    ca = make_manufacturer_ca(tmp_path / "ca", "acme-tpm")
    conf = (ca.directory / "swtpm-localca.conf").read_text()
    assert f"statedir = {ca.directory}/state" in conf
    assert "/var/lib/swtpm-localca" not in conf
    assert "@" not in (ca.directory / "swtpm_setup.conf").read_text()
    assert load_manufacturer_ca(tmp_path / "ca") == ca
    assert ensure_manufacturer_ca(tmp_path / "ca", "other-name") == ca  # kept, not remade
    with pytest.raises(ConfigError, match="already holds"):
        make_manufacturer_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match="not a manufacturer CA"):
        load_manufacturer_ca(tmp_path)
    with pytest.raises(ConfigError, match="manufacturer name"):
        make_manufacturer_ca(tmp_path / "ca2", "bad name")


@pytest.mark.parametrize(
    "argv",
    [
        ["--image", "kernel"],
        ["--component-version", "=1.0"],
        ["--tamper", "initrd"],
    ],
)
def test_cli_refuses_bad_firmware_arguments(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["device", "--state", str(tmp_path / "dev"), *argv]) == 1
    assert "firmware-sim device:" in capsys.readouterr().err
    assert not (tmp_path / "dev").exists()


def test_a_mistyped_manufacturer_ca_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "manufactuer-ca"
    state = tmp_path / "dev"
    assert main(["device", "--state", str(state), "--manufacturer-ca", str(typo)]) == 1
    assert capsys.readouterr().err == (
        f"firmware-sim device: --manufacturer-ca {typo}: no manufacturer CA there (no "
        "swtpm_setup.conf); give an existing CA directory, or add --create-manufacturer-ca "
        "to make a new one\n"
    )
    assert not typo.exists() and not state.exists()


def _ca_check(argv: list[str]) -> str | None:
    return _manufacturer_ca_check(_build_parser().parse_args(["device", *argv]))


def test_creating_a_manufacturer_ca_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "fleet" / "dev"
    assert _ca_check(["--state", str(state)]) is None  # the default place: made, and said
    err = capsys.readouterr().err
    default_ca = tmp_path / "fleet" / "manufacturer-ca"
    assert err.startswith(f"firmware-sim device: creating a new manufacturer CA in {default_ca}")
    assert "state/swtpm-localca-rootca-cert.pem and state/issuercert.pem" in err
    chosen = tmp_path / "new-ca"
    assert (
        _ca_check(
            ["--state", str(state), "--manufacturer-ca", str(chosen), "--create-manufacturer-ca"]
        )
        is None
    )
    assert f"creating a new manufacturer CA in {chosen}" in capsys.readouterr().err


def test_an_existing_manufacturer_ca_or_tpm_is_silent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "swtpm_setup.conf").write_text("")
    assert _ca_check(["--state", str(tmp_path / "a"), "--manufacturer-ca", str(ca)]) is None
    made = tmp_path / "b"
    (made / TPM_DIR).mkdir(parents=True)
    (made / TPM_DIR / STATE_FILE).write_bytes(b"")  # a manufactured TPM: the CA is not used
    assert _ca_check(["--state", str(made), "--manufacturer-ca", str(tmp_path / "gone")]) is None
    assert capsys.readouterr().err == ""
