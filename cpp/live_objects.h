// Native objects alive in this process, for leak tests: each counted object holds one LiveObject,
// declared first among its members, so it is counted from before the rest of it is built until
// after the rest is destroyed, and a constructor that throws uncounts it by itself.
#pragma once

namespace llava_kv {

enum class LiveKind { Model, Session, BatchRunner };

class LiveObject {
  public:
    explicit LiveObject(LiveKind kind);
    ~LiveObject();
    LiveObject(const LiveObject &) = delete;
    LiveObject & operator=(const LiveObject &) = delete;

  private:
    LiveKind kind_;
};

struct LiveCounts {
    long models = 0;
    long sessions = 0;
    long batch_runners = 0;
};
LiveCounts live_counts();

}  // namespace llava_kv
