// read_record(dir_fd, shard, name, dir_flags, file_flags, head, payload) -> int: one record file read
// with the GIL released once (kvtier/record_files.py `RecordDir.read`).
//
// Why: in Python a read is five system calls (open the shard directory, open the file, close the
// directory, preadv, close the file), and each gives the GIL up and takes it back. With four read
// threads and a retrieving thread on 2 vCPUs, taking it back cost ~40 us per call, ~150 us per
// 512 KiB read: time each read thread spent off the disk. Here the five calls run with the GIL
// released once.
//
//   openat(dir_fd, shard, dir_flags) -> sfd; openat(sfd, name, file_flags) -> fd; close(sfd);
//   preadv(fd, [head, payload], 0) -> the bytes read; close(fd).
//
// Errors raise OSError (FileNotFoundError for ENOENT, ...) with the errno and the name, as os.open and
// os.preadv would; the caller's flags decide O_NOFOLLOW, O_DIRECT and the rest. Both buffers are held
// (exported, writable) while the GIL is released.
#include "record_read.h"

#include "held_buffer.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

namespace kvtier_io {

namespace {

using Held = kvtier_native::HeldBuffer;

struct Outcome {
  ssize_t got = -1;
  int err = 0;
  bool at_shard = false;  // the error was the shard directory's
};

int open_at(int dir_fd, const char* name, int flags) {  // retried on EINTR, as os.open is
  int fd;
  do {
    fd = openat(dir_fd, name, flags);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

Outcome read_file(int dir_fd, const char* shard, const char* name, int dir_flags, int file_flags,
                  iovec* iov) {
  Outcome out;
  const int sfd = open_at(dir_fd, shard, dir_flags);
  if (sfd < 0) {
    out.err = errno, out.at_shard = true;
    return out;
  }
  const int fd = open_at(sfd, name, file_flags);
  const int open_err = errno;
  close(sfd);
  if (fd < 0) {
    out.err = open_err;
    return out;
  }
  do {
    out.got = preadv(fd, iov, 2, 0);
  } while (out.got < 0 && errno == EINTR);
  if (out.got < 0) out.err = errno;
  close(fd);
  return out;
}

// An int argument in [low, INT_MAX]: TypeError or OverflowError (as os.open gives) otherwise.
bool take_int(PyObject* obj, long low, int* out) {
  const long v = PyLong_AsLong(obj);
  if (v == -1 && PyErr_Occurred()) return false;
  if (v < low || v > INT_MAX) {
    PyErr_Format(PyExc_OverflowError, "%ld is out of range [%ld, %d]", v, low, INT_MAX);
    return false;
  }
  *out = static_cast<int>(v);
  return true;
}

}  // namespace

PyObject* read_record(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    return PyErr_Format(PyExc_TypeError, "read_record(dir_fd, shard, name, dir_flags, file_flags, head, payload)");
  }
  int dir_fd, dir_flags, file_flags;
  if (!take_int(args[0], 0, &dir_fd) || !take_int(args[3], INT_MIN, &dir_flags) ||
      !take_int(args[4], INT_MIN, &file_flags)) {
    return nullptr;
  }
  if ((dir_flags | file_flags) & O_CREAT) return PyErr_Format(PyExc_ValueError, "read_record never creates");
  if (!PyBytes_Check(args[1]) || !PyBytes_Check(args[2])) {
    return PyErr_Format(PyExc_TypeError, "shard and name must be bytes");
  }
  const char* shard = PyBytes_AS_STRING(args[1]);
  const char* name = PyBytes_AS_STRING(args[2]);
  if (static_cast<Py_ssize_t>(strlen(shard)) != PyBytes_GET_SIZE(args[1]) ||
      static_cast<Py_ssize_t>(strlen(name)) != PyBytes_GET_SIZE(args[2])) {
    return PyErr_Format(PyExc_ValueError, "embedded null byte");
  }
  Held head, payload;
  if (!head.get(args[5], PyBUF_WRITABLE) || !payload.get(args[6], PyBUF_WRITABLE)) return nullptr;
  iovec iov[2] = {{head.view.buf, static_cast<size_t>(head.view.len)},
                  {payload.view.buf, static_cast<size_t>(payload.view.len)}};
  Outcome out;
  Py_BEGIN_ALLOW_THREADS out = read_file(dir_fd, shard, name, dir_flags, file_flags, iov);
  Py_END_ALLOW_THREADS
  if (out.got < 0) {
    errno = out.err;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, out.at_shard ? args[1] : args[2]);
  }
  return PyLong_FromSsize_t(out.got);
}

}  // namespace kvtier_io
