// ZeroMQ 4.3 (libzmq3-dev).
#include <zmq.h>
