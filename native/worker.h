// Promise-returning async work. Subclasses copy their JS inputs into plain members in the
// constructor (main thread), compute in Run() (worker thread, never touching JS values) and
// build the JS result in Result() (main thread). Errors from libtorch (c10::Error) and the C++
// library become a rejected promise whose message starts with the job's context.
#pragma once

#include <c10/util/Exception.h>
#include <napi.h>

#include <string>

namespace si {

class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, std::string context)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), context_(std::move(context)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  virtual void Run() = 0;
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }

  void Execute() override {
    try {
      Run();
    } catch (const c10::Error& e) {
      SetError(context_ + ": " + e.what_without_backtrace());
    } catch (const std::exception& e) {
      SetError(context_ + ": " + e.what());
    } catch (...) {
      SetError(context_ + ": unknown native error");
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(Result(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::exception& e) {
      deferred_.Reject(Napi::Error::New(env, context_ + ": " + e.what()).Value());
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

  Napi::Promise::Deferred deferred_;
  std::string context_;
};

}  // namespace si
