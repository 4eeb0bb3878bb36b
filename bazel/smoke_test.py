"""Smoke test of a separately built CUDA library (bazel test //:jevo_cuda_smoke_test).

Imports jevo with JEVO_CUDA_LIBRARY pointing at the library under test and checks that jevo loaded
that file and registered its FFI targets. Without a CUDA device (CI) nothing more can run; with
one, the selftest kernel runs under jax.jit as well.
"""

import os
import sys
import unittest

LIBRARY = os.environ.get("JEVO_CUDA_LIBRARY", "")
EXPECTED_ARCHS = os.environ.get("JEVO_EXPECTED_CUDA_ARCHS")
TARGETS = {"jevo_selftest", "jevo_attention_fwd", "jevo_attention_bwd"}


class LibrarySmokeTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    if not LIBRARY or not os.path.isfile(LIBRARY):
      raise AssertionError(f"JEVO_CUDA_LIBRARY={LIBRARY!r} is not a file")
    import jevo  # noqa: PLC0415 -- after the environment is known to be set.
    from jevo import _cuda_lib  # noqa: PLC0415

    cls.jevo = jevo
    cls.cuda_lib = _cuda_lib
    print(f"jevo from {os.path.dirname(jevo.__file__)}; {jevo.cuda_status()}", file=sys.stderr)

  def test_jevo_loaded_this_library(self):
    status = self.jevo.cuda_status()
    self.assertIsNotNone(status.library, status.reason)
    self.assertTrue(os.path.samefile(status.library, LIBRARY), f"{status.library} != {LIBRARY}")

  def test_ffi_targets_registered(self):
    missing = TARGETS - set(self.cuda_lib.REGISTERED_TARGETS)
    self.assertFalse(missing, f"not registered: {sorted(missing)}; "
                     f"registered: {sorted(self.cuda_lib.REGISTERED_TARGETS)}")

  def test_built_for_the_requested_architectures(self):
    if EXPECTED_ARCHS is None:
      self.skipTest("JEVO_EXPECTED_CUDA_ARCHS not set")
    self.assertEqual(self.jevo.cuda_status().architectures, EXPECTED_ARCHS)

  def test_families_built_for_their_architectures(self):
    """The sm80 family is always built; the sm90 (wgmma) family exactly when sm_90a is listed."""
    families = {f.name: f for f in self.cuda_lib.kernel_families()}
    self.assertEqual(sorted(families), ["sm80", "sm90"])
    self.assertTrue(families["sm80"].built)
    archs = (self.jevo.cuda_status().architectures or "").split(",")
    self.assertEqual(families["sm90"].built, any(a.startswith("90a") for a in archs), archs)

  def test_status_without_device_says_why(self):
    status = self.jevo.cuda_status()
    if status.available:
      self.skipTest("a CUDA device is present")
    self.assertIn("no CUDA device", status.reason)

  def test_selftest_kernel_on_device(self):
    if not self.jevo.cuda_status().available:
      self.skipTest("no CUDA device")
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jevo.selftest import ffi_axpy  # noqa: PLC0415

    x = np.arange(1001, dtype=np.float32)
    y = np.ones(1001, np.float32)
    out = jax.jit(lambda a, b: ffi_axpy(2.5, a, b))(x, y)
    np.testing.assert_allclose(np.asarray(out), 2.5 * x + y, rtol=1e-6)


if __name__ == "__main__":
  unittest.main(verbosity=2)
