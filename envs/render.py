"""Offscreen camera images for MuJoCo tasks (MUJOCO_GL is chosen in the package's __init__,
which runs before any of its modules imports mujoco)."""

from __future__ import annotations

import atexit
import weakref

import mujoco
import numpy as np

_OFF_FLAGS = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX)
_LIVE: "weakref.WeakSet[CameraRenderer]" = weakref.WeakSet()


def _close_live_renderers() -> None:
    """GL contexts freed during interpreter teardown (after EGL is gone) print EGL errors;
    close whatever an unclosed env left open while EGL still works. Registered after the
    first GL context exists, so it runs before mujoco's own atexit eglTerminate."""
    for renderer in list(_LIVE):
        renderer.close()


class CameraRenderer:
    """Renders named cameras of one model at any square size.

    fast=True turns off shadows, multisampling, reflections and the skybox: about 10x cheaper
    per frame at policy resolutions, where those effects are invisible anyway. Shadow-map and
    multisample sizes are read when a GL context is made, so model.vis is edited just before
    the first one; nothing is touched until something is rendered.
    """

    def __init__(self, model: mujoco.MjModel, fast: bool = True) -> None:
        self.model = model
        self.fast = fast
        self._renderers: dict[int, mujoco.Renderer] = {}
        self.camera_names = tuple(model.camera(i).name for i in range(model.ncam))

    def _renderer(self, size: int) -> mujoco.Renderer:
        if size not in self._renderers:
            if self.fast:
                self.model.vis.quality.shadowsize = 0
                self.model.vis.quality.offsamples = 0
            renderer = mujoco.Renderer(self.model, size, size)
            if not _LIVE:
                atexit.register(_close_live_renderers)
            _LIVE.add(self)
            if self.fast:
                for flag in _OFF_FLAGS:
                    renderer.scene.flags[flag] = False
            self._renderers[size] = renderer
        return self._renderers[size]

    def render(self, data: mujoco.MjData, camera: str, size: int) -> np.ndarray:
        """uint8 (size, size, 3), upright: a camera whose up axis points below the horizon
        (Meta-World's corner cameras) is rotated 180 degrees."""
        cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        renderer = self._renderer(size)
        renderer.update_scene(data, cam_id)
        image = renderer.render()
        up_z = data.cam_xmat[cam_id].reshape(3, 3)[2, 1]  # world z of the camera's image-up axis
        if up_z < -0.1:
            image = np.ascontiguousarray(image[::-1, ::-1])
        return image

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
