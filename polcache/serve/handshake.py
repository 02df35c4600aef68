"""Does a robot fit the hosted policy? Compared field by field at connection time, so a
mismatch is refused once with a message naming the field instead of failing every request."""

from __future__ import annotations

import numpy as np

from polcache.config import INSTRUCTION_KEY
from polcache.policy.language import InstructionError, encode_instruction
from polcache.policy.spec import ArraySpec, PolicySpec, rate_mismatch
from polcache_client.protocol import Handshake, ObsSpec, ProtocolError, robot_name


def wire_obs_spec(obs: dict[str, ArraySpec]) -> ObsSpec:
    """ArraySpecs (policy, TaskEnv) in the protocol's key -> (shape, dtype) form."""
    return {key: (tuple(a.shape), a.dtype) for key, a in obs.items()}


def robot_obs_spec(spec: PolicySpec) -> ObsSpec:
    """What a robot sends each tick: the policy's observations but the instruction, which it sends
    at handshake and reset (the server adds it to every observation)."""
    return wire_obs_spec({k: a for k, a in spec.obs.items() if k != INSTRUCTION_KEY})


def own_robot_name(name: str, field: str) -> str:
    """A name one of polcache's own robots announces (sim-robot --name, launch's robot.name): what the
    server accepts (printable UTF-8) and not blank. Raises ProtocolError naming `field`."""
    if not name.strip():
        raise ProtocolError("bad_type", f"{field}: expected a non-empty name, got {name!r}")
    return robot_name(name, field)


def policy_instruction(text: str, spec: PolicySpec, field: str) -> np.ndarray | None:
    """`text` encoded for the policy's instruction key; None for a policy without language (which
    ignores instructions). Raises InstructionError naming `field`: a PolcacheError, so an operator's
    bad --instruction is one line at the command line rather than a traceback."""
    if INSTRUCTION_KEY not in spec.obs:
        return None
    return encode_instruction(text, spec.obs[INSTRUCTION_KEY].shape[0], field)


def operator_instruction(text: str, spec: PolicySpec, field: str) -> np.ndarray:
    """An instruction an operator gives for every episode or robot (eval's or serve's --instruction),
    encoded; refused for a policy without language, which would ignore it without a word."""
    if INSTRUCTION_KEY not in spec.obs:
        raise InstructionError(f"{field}: this policy takes no instruction (it is not language-conditioned)")
    return policy_instruction(text, spec, field)


def session_instruction(text: str | None, spec: PolicySpec, default: str | None, field: str) -> np.ndarray | None:
    """The encoded instruction a robot's observations carry: its own (`text`), else the server's
    `default`; None for a policy without language (which ignores instructions). Refused with
    `bad_instruction`, naming `field`, where the policy needs one and has none or it does not fit."""
    if INSTRUCTION_KEY not in spec.obs:
        return None
    text = text if text is not None else default
    if text is None:
        raise ProtocolError("bad_instruction", f"{field}: the hosted policy follows an instruction; send one "
                                               "(protocol version 3) or start the server with --instruction")
    try:
        return policy_instruction(text, spec, field)
    except InstructionError as exc:
        raise ProtocolError("bad_instruction", str(exc)) from None


def check_handshake(handshake: Handshake, spec: PolicySpec) -> None:
    """Raise ProtocolError('spec_mismatch') naming the first field where robot and policy differ; a
    control rate other than the policy's training rate is only warned of (rate_warning)."""
    robot, policy = handshake.obs_spec, robot_obs_spec(spec)

    def refuse(message: str) -> None:
        raise ProtocolError("spec_mismatch", message)

    if set(policy) - set(robot):
        refuse(f"obs_spec: the policy needs key(s) {sorted(set(policy) - set(robot))} that the robot does not send")
    if INSTRUCTION_KEY in robot and INSTRUCTION_KEY in spec.obs:
        refuse(f"obs_spec: {INSTRUCTION_KEY!r} is not sent each tick: it goes in handshake.instruction and "
               "reset.instruction (protocol version 3), and the server adds it to every observation")
    if set(robot) - set(policy):
        refuse(f"obs_spec: the robot sends key(s) {sorted(set(robot) - set(policy))} that the policy does not use")
    for key, (shape, dtype) in policy.items():
        if robot[key][0] != shape:
            refuse(f"obs_spec.{key}.shape: robot {robot[key][0]} != policy {shape}")
        if robot[key][1] != dtype:
            refuse(f"obs_spec.{key}.dtype: robot {robot[key][1]} != policy {dtype}")
    if handshake.action_dim != spec.action_dim:
        refuse(f"action_dim: robot {handshake.action_dim} != policy {spec.action_dim}")


def rate_warning(handshake: Handshake, spec: PolicySpec, robot: str) -> str | None:
    """What the server warns of (once per session) where `robot` ticks at another rate than the policy
    was trained at, else None. Served all the same: a robot may mean to run at its own rate, and a
    simulation stepped once per tick is unaffected; a real robot is not, and its operator is told."""
    if not rate_mismatch(spec.control_hz, handshake.hz):
        return None
    return (f"robot {robot} ticks at {handshake.hz:g} Hz but the policy was trained at {spec.control_hz:g} Hz: its "
            f"actions are per control step at {spec.control_hz:g} Hz, so this robot plays them at "
            f"{handshake.hz / spec.control_hz:.2g}x the trained speed (served all the same)")
