// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title Target
/// @notice Small contract for Countersign's contract-call tests: a plain state
///         change (increment), a payable call (deposit), an owner-only admin call
///         (setPaused), and predictable revert reasons.
contract Target {
    uint256 public counter;
    mapping(address => uint256) public deposits;
    bool public paused;
    address public owner;

    constructor() {
        owner = msg.sender;
    }

    function increment(uint256 by) external {
        require(!paused, "Target: paused");
        counter += by;
    }

    function deposit() external payable {
        require(!paused, "Target: paused");
        deposits[msg.sender] += msg.value;
    }

    function setPaused(bool p) external {
        require(msg.sender == owner, "Target: not owner");
        paused = p;
    }
}
