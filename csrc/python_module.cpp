// An empty Python module so that `import fastood._C` loads this library and runs its
// TORCH_LIBRARY registrations. Built by setup.py only (the CMake library needs no Python).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastood native ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
